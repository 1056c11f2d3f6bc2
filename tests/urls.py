from django.contrib import admin
from django.urls import path

from channel_registry.views import EventStreamView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("events/", EventStreamView.as_view()),
]
