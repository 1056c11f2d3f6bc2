"""Two headers-and-redirects concerns of the demo, with no new dependency."""

from django.contrib.auth import middleware as auth_middleware
from django.http import HttpResponse
from django.utils.deprecation import MiddlewareMixin

#: Scripts and styles only from this site (static ES modules, no inline code), so a
#: message that slipped through as HTML still could not run anything.
#: ``connect-src 'self'`` covers the same-origin ws:// and wss:// URLs.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    def process_response(self, request, response):
        response.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response


class LoginRequiredMiddleware(auth_middleware.LoginRequiredMiddleware):
    """Every view needs a session. Pages redirect to the login form; fetch() calls and
    event streams get a bare 401 that the client can act on (a redirect to an HTML
    page would only look like a broken response to them)."""

    def handle_no_permission(self, request, view_func):
        if "text/html" in request.headers.get("Accept", ""):
            return super().handle_no_permission(request, view_func)
        return HttpResponse("Authentication required.", status=401, content_type="text/plain")
