"""The greetings greeter.v2 speaks, by locale."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError

DEFAULT_LOCALE = "en"
# Each locale's greeting, and the "World" an empty name stands for in it.
_GREETINGS: dict[str, tuple[str, str]] = {
    "en": ("Hello {name} from greeter-service!", "World"),
    "ja": ("こんにちは、{name}さん。greeter-service より!", "世界"),
    "fr": ("Bonjour {name} de la part de greeter-service !", "le monde"),
    "es": ("¡Hola {name} desde greeter-service!", "Mundo"),
    "de": ("Hallo {name} von greeter-service!", "Welt"),
}
KNOWN_LOCALES = tuple(_GREETINGS)


def checked_locale(locale: str) -> str:
    """The locale to greet in (empty means en); `invalid_argument` naming the known ones."""
    locale = locale or DEFAULT_LOCALE
    if locale not in _GREETINGS:
        raise ConnectError(
            Code.INVALID_ARGUMENT,
            f"unknown locale {locale[:32]!r}; known locales: {', '.join(KNOWN_LOCALES)}",
        )
    return locale


def localized_greeting(name: str, locale: str) -> str:
    """The greeting for `name` (empty: the locale's World) in a locale `checked_locale` accepted."""
    template, world = _GREETINGS[locale]
    return template.format(name=name or world)
