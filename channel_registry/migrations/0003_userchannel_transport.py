from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("channel_registry", "0002_userchannel_session"),
    ]

    operations = [
        migrations.AddField(
            model_name="userchannel",
            name="transport",
            field=models.CharField(
                blank=True,
                choices=[("socket", "WebSocket"), ("stream", "event stream"), ("", "unknown")],
                db_default="",
                default="",
                max_length=10,
            ),
        ),
    ]
