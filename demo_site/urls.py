from django.contrib.auth import views as auth_views
from django.urls import path

from demo_site.inbox import views

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="inbox/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.inbox, name="inbox"),
    path("events/", views.InboxEventStream.as_view(), name="events"),
    path("presence/", views.presence, name="presence"),
    path("messages/", views.send_message, name="send-message"),
    path("notifications/", views.unread_notifications, name="notifications"),
    path("notifications/read/", views.mark_all_read, name="mark-all-read"),
]
