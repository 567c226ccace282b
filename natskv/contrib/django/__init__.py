"""Django integration: a cache backend with an optional near cache, and a session engine.

In settings.py::

    CACHES = {
        "default": {
            "BACKEND": "natskv.contrib.django.NatsKVCache",
            "LOCATION": "nats://127.0.0.1:4222",   # or a list; "" = natskv's embedded server
            "OPTIONS": {"bucket": "django_cache", "near_cache": True},
        }
    }
    SESSION_ENGINE = "natskv.contrib.django.sessions"   # or Django's "cache" / "cached_db"

See :class:`natskv.contrib.django.cache.NatsKVCache` and :mod:`natskv.contrib.django.sessions`.
"""

from natskv.contrib.django.cache import NatsKVCache

__all__ = ["NatsKVCache"]
