"""The cron canary: a short, bounded probe of every listed sub-account, with history,
metrics and alerts (issue 6)."""
