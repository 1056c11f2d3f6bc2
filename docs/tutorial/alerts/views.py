from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_POST

from channel_registry import notify_user


@login_required
def page(request):
    return render(request, "alerts/page.html")


@login_required
@require_POST
def poke(request):
    recipient = get_object_or_404(get_user_model(), username=request.POST.get("username"))
    delivery = notify_user(recipient, {"text": f"{request.user.username} poked you"})
    return JsonResponse({"tabs_reached": delivery.sent})
