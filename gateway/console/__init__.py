"""The admin console at /admin/ui: server-rendered pages over the admin API's own data."""
