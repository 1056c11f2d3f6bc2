from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("channel_registry", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="userchannel",
            name="session",
            field=models.CharField(blank=True, db_default="", db_index=True, default="", max_length=64),
        ),
    ]
