"""GET /dashboard (a live page, no build step: HTML, CSS and JS served from server/static) and GET /v1/stats,
the JSON it polls every second, documented for scripts (docs/dashboard.md).

The page holds no data: it asks /v1/stats with the key typed into its login field (kept in the tab's
sessionStorage, sent as a bearer header, never in a URL). Its admin actions call the existing admin routes.
Any app whose `app.state.loraplex` is a ServerState can include this router.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from loraplex.engine.admin import ListAdapters
from loraplex.server.errors import APIError
from loraplex.server.openai_routes import ERRORS
from loraplex.server.state import ServerState
from loraplex.server.stats.view import combined, stats_json, tenant_rows

router = APIRouter()
STATIC = Path(__file__).parent / "static"
ASSETS = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
# Everything the page loads comes from this server; nothing inline runs, no other site may frame it.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@cache
def _static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


@router.get("/dashboard", include_in_schema=False)
async def dashboard(request: Request) -> HTMLResponse:
    """The page. It says whether the server wants a key, so that it asks for one before its first poll."""
    st: ServerState = request.app.state.loraplex
    auth = "open" if st.auth.keys is None else "key"
    html = _static("dashboard.html").replace('content="open"', f'content="{auth}"', 1)
    return HTMLResponse(html, headers=HEADERS)


@router.get("/dashboard/{asset}", include_in_schema=False)
async def dashboard_asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise APIError(404, f"no dashboard file {asset!r} (files: {', '.join(ASSETS)})", "not_found")
    return Response(_static(asset), media_type=ASSETS[asset], headers=HEADERS)


@router.get("/v1/stats", responses=ERRORS)
async def stats(request: Request) -> JSONResponse:
    """Adapters by tier, per-tenant rates and latency percentiles, the last steps' batches, the base model (behind
    a cluster: every replica's, combined and listed per replica). Admin keys see everything; tenant keys see the
    base model and their own tenants' rows."""
    st: ServerState = request.app.state.loraplex
    scope = st.auth.scope(request)
    engine_stats = await st.engine.stats()  # one per engine: a cluster's replicas each
    catalog = await st.engine.admin(ListAdapters())
    rows = tenant_rows(st.metrics.tenants, st.engine, st.served_name, combined(engine_stats), catalog, scope)
    body = stats_json(st.engine, st.served_name, st.created, engine_stats, catalog, rows, scope,
                      st.metrics.shares.rows())
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
