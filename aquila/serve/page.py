"""The chat page at `/`: one static HTML file with plain JavaScript over `/v1/chat/completions` and `/v1/models`."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

# The page loads nothing from the network; the browser enforces it too.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def chat_page_html() -> str:
    return resources.files("aquila.serve").joinpath("chat.html").read_text(encoding="utf-8")


def add_chat_page(app: FastAPI) -> None:
    """Serve the chat page at `GET /`."""
    html = chat_page_html()
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)
