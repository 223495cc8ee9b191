"""Integrations that live outside the hook system (SDKs for other languages, deployment
files). Installed under the import name `watchllm_contrib`."""
