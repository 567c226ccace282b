"""Integrations with web frameworks: :mod:`natskv.contrib.django` and :mod:`natskv.contrib.flask`,
both built on the framework-neutral cache of :mod:`natskv.contrib.cache`.

Nothing here is imported by ``import natskv``; Django and Flask are optional extras
(``pip install "natskv[django]"`` or ``"natskv[flask]"``).
"""
