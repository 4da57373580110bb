"""``host:port`` addresses: parsing and formatting, for the client and the daemons alike."""

from __future__ import annotations

__all__ = ["parse_address", "format_address"]


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` too) into ``(host, port)``.

    ``default_port`` is used when ``text`` has no port at all.

    Raises:
        ValueError: not an address, no host, or a bad port; the message quotes ``text``.
    """
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_s = rest.lstrip(":")
    elif text.count(":") == 1:
        host, _, port_s = text.partition(":")
    elif ":" not in text and default_port is not None:
        host, port_s = text, str(default_port)
    else:
        raise ValueError(f"not a host:port address: {text!r}")
    if not host:
        raise ValueError(f"address without a host: {text!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"address with a bad port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:7000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
