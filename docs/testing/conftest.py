pytest_plugins = ["channel_registry.pytest_plugin"]
