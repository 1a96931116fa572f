"""Colours taken from the palette, so that text stays readable in a light and in a dark theme.

The pages write their status colours (:data:`WARN`, :data:`ERROR`, :data:`GOOD`) and the secondary
text colour (:data:`MUTED`) into rich text as fixed light-theme values; :func:`themed_html` swaps
each for the palette's own version, one with a contrast of at least 4.5:1 (WCAG AA for body text)
against the palette's window colour. :class:`gui.pages.base.RichLabel` does that on every
``setText`` and again when the palette changes. The pruned rows of the neuron table get a red tint
of the palette's base colour (:func:`pruned_row`), and :func:`dark_palette` is a dark desktop theme
for the screenshots and the tests.
"""

from __future__ import annotations

import re

from PySide6.QtGui import QColor, QPalette

#: Text colours of a light theme (each with at least 4.5:1 on white and on Qt's light grey #efefef): a
#: warning (the user should look), an error, a success, secondary text.
WARN = "#a35200"
ERROR = "#b00020"
GOOD = "#17732f"
MUTED = "#555555"
#: The data colour of a pruned neuron (the plots' red).
PRUNED = "#d62728"
#: WCAG AA: the least contrast for body text.
MIN_CONTRAST = 4.5

Role = QPalette.ColorRole


def luminance(colour: QColor) -> float:
    """Relative luminance (WCAG 2), 0 for black to 1 for white."""
    def channel(v: float) -> float:
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    c = QColor(colour)
    return 0.2126 * channel(c.redF()) + 0.7152 * channel(c.greenF()) + 0.0722 * channel(c.blueF())


def contrast(a: QColor, b: QColor) -> float:
    """Contrast ratio (WCAG 2) of two opaque colours, 1 to 21."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def blend(a: QColor, b: QColor, share: float) -> QColor:
    """``share`` of ``a`` over ``b`` (both opaque)."""
    a, b = QColor(a), QColor(b)
    mix = lambda x, y: round(share * x + (1 - share) * y)  # noqa: E731
    return QColor(mix(a.red(), b.red()), mix(a.green(), b.green()), mix(a.blue(), b.blue()))


def readable(colour: QColor, background: QColor, minimum: float = MIN_CONTRAST) -> QColor:
    """``colour``, or the least lightened (on a dark background) or darkened version of it that has
    ``minimum`` contrast against ``background``: the hue stays as far as it can."""
    colour, background = QColor(colour), QColor(background)
    extreme = max((QColor("#ffffff"), QColor("#000000")), key=lambda e: contrast(e, background))
    for step in range(21):
        candidate = blend(extreme, colour, step / 20)
        if contrast(candidate, background) >= minimum:
            return candidate
    return extreme


def muted_text(palette: QPalette, background: Role = Role.Window) -> QColor:
    """Secondary text (subtitles, paths): between the text and the background colour, readable."""
    bg = palette.color(background)
    text = palette.color(Role.WindowText if background == Role.Window else Role.Text)
    return readable(blend(text, bg, 0.6), bg)


def text_colours(palette: QPalette) -> dict[str, str]:
    """Each light-theme text colour -> the palette's readable version of it (on the window colour)."""
    window = palette.color(Role.Window)
    out = {token: readable(QColor(token), window).name() for token in (WARN, ERROR, GOOD)}
    out[MUTED] = muted_text(palette).name()
    return out


_COLOUR = re.compile(r"(color\s*:\s*)(#[0-9a-fA-F]{6})\b")


def themed_html(text: str, palette: QPalette) -> str:
    """``text`` with every ``color:`` of :data:`WARN`, :data:`ERROR`, :data:`GOOD` or :data:`MUTED`
    replaced by the palette's version of it."""
    if "color" not in text:
        return text
    colours = {k.lower(): v for k, v in text_colours(palette).items()}
    return _COLOUR.sub(lambda m: m.group(1) + colours.get(m.group(2).lower(), m.group(2)), text)


def pruned_row(palette: QPalette) -> tuple[QColor, QColor]:
    """Background and text colour of a pruned neuron's row: a red tint of the base colour, with the
    palette's text colour (the tint is lighter where the text would not stand out enough)."""
    base, text = palette.color(Role.Base), palette.color(Role.Text)
    for share in (0.3, 0.22, 0.15, 0.08, 0.0):
        background = blend(QColor(PRUNED), base, share)
        if contrast(text, background) >= MIN_CONTRAST:
            return background, text
    return background, readable(text, background)


def dark_palette() -> QPalette:
    """A dark theme, as a desktop's dark mode gives it (all colour groups; disabled text dimmed)."""
    colours = {
        Role.Window: "#202124", Role.WindowText: "#e8eaed", Role.Base: "#2b2c30", Role.AlternateBase: "#323337",
        Role.Text: "#e8eaed", Role.Button: "#303134", Role.ButtonText: "#e8eaed", Role.BrightText: "#ffffff",
        Role.Light: "#4a4c50", Role.Midlight: "#3c4043", Role.Mid: "#5f6368", Role.Dark: "#17181a",
        Role.Shadow: "#000000", Role.Highlight: "#8ab4f8", Role.HighlightedText: "#202124",
        Role.ToolTipBase: "#3c4043", Role.ToolTipText: "#e8eaed", Role.Link: "#8ab4f8",
        Role.LinkVisited: "#c58af9", Role.PlaceholderText: "#9aa0a6",
    }
    palette = QPalette()
    for role, name in colours.items():
        palette.setColor(role, QColor(name))
    for role in (Role.WindowText, Role.Text, Role.ButtonText, Role.PlaceholderText):
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor("#80868b"))
    return palette
