"""What the server tells about itself, in one room: `prometheus` (/metrics: the server's series and the engine's
snapshot), `tenants` (the dashboard's bounded per-tenant and per-key windows), `tracker` (one request's timing and
outcome, into both) and `view` (the JSON of /v1/stats, per scope). The routes that serve them:
server/admin_routes.py (/metrics) and server/dashboard_routes.py (/dashboard, /v1/stats)."""
