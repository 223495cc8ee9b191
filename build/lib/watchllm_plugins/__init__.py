"""First-party WatchLLM plugins, written only against the public hook API of watchllm_ext.

Installed under the import name `watchllm_plugins` (a bare `plugins` collides with other
distributions) and found through the `watchllm` entry-point group like any third party's.
"""
