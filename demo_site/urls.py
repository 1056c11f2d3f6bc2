from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.urls import path, reverse_lazy

from channel_registry.metrics import metrics_view
from demo_site.inbox import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("login/", auth_views.LoginView.as_view(template_name="inbox/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Changing the password closes the user's connections (CLOSE_ON_PASSWORD_CHANGE): this
    # session's come back, other browsers' are signed out.
    path("password/", auth_views.PasswordChangeView.as_view(
        template_name="inbox/password_change.html", success_url=reverse_lazy("inbox")), name="password-change"),
    path("", views.inbox, name="inbox"),
    path("events/", views.InboxEventStream.as_view(), name="events"),
    path("presence/", views.presence, name="presence"),
    path("messages/", views.send_message, name="send-message"),
    path("notifications/", views.unread_notifications, name="notifications"),
    path("notifications/read/", views.mark_all_read, name="mark-all-read"),
    # Open to anyone here, for Prometheus to scrape; in production route it where only the scraper reaches it.
    path("metrics", login_not_required(metrics_view), name="metrics"),
]
