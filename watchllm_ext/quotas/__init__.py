"""Plan quotas and budgets (issue 16, docs/QUOTAS.md): plans in settings, usage counted in
this process (`memory`) or in Redis (`redis`), USD budgets read from the store, plan changes
from Stripe. The plugin is built in (watchllm_ext.quotas.plugin) and off until
`quota_backend` is set. This package imports nothing heavy: settings import its plans.
"""
