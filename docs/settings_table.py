"""Print the README's settings table, made from random_user_config's settings and their checks.

    python docs/settings_table.py           # print the table
    python docs/settings_table.py --write   # put it into README.md between its markers

tests/test_docs.py fails when the README's table is not this one.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
config = importlib.import_module("random_user_config")  # the installed project: pip install -e . for this checkout's
places = importlib.import_module("_random_user_etl.places")

README = ROOT / "README.md"
BEGIN = "<!-- settings table: made by `python docs/settings_table.py --write`; tests/test_docs.py checks it -->"
END = "<!-- end of settings table -->"
HEADER = "| setting | flag | variable | default | accepts |\n| --- | --- | --- | --- | --- |"


def table() -> str:
    """The settings table in Markdown, one row per setting."""
    defaults = config.Settings()
    return "\n".join([HEADER, *(row(setting, defaults) for setting in config.SETTINGS)])


def row(setting, defaults) -> str:
    """One setting's row: what it does, its flag, its variable, its default, the values it takes."""
    cells = [setting.help, f"`{setting.flag}`", f"`{setting.env}`", default(setting, defaults), accepts(setting, defaults)]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def default(setting, defaults) -> str:
    """The default as --help words it; a folder relative to where it lies, as the same default reads on every machine."""
    words = config.help_text(setting, defaults)
    prefix, suffix = f"{setting.help} (default", f") [{setting.env}]"
    if not (words.startswith(prefix) and words.endswith(suffix)):
        raise SystemExit(f"settings_table.py: --help of {setting.flag} no longer reads '<help> (default ...) [<variable>]': {words!r}")
    text = words[len(prefix) : -len(suffix)]
    if text.startswith(": "):  # no value: what that means, in words
        return text[2:]
    if setting.flag_options.get("metavar") == "DIR":
        return f"`{relative_folder(getattr(defaults, setting.name))}`"
    return f"`{text.strip()}`"


def relative_folder(path: str) -> str:
    """A default folder as ./name: relative to the working folder, or to the job's own folder, whichever holds it."""
    if os.path.isabs(path):
        for base in (Path.cwd(), Path(str(config.__file__)).resolve().parent):
            if places.lies_in(path, base):
                path = os.path.relpath(os.path.realpath(path), os.path.realpath(base))
                break
        else:
            return Path(path).as_posix()
    return "./" + Path(path).as_posix()


def accepts(setting, defaults) -> str:
    """The values a setting takes, in the words of the check that refuses the others."""
    value = getattr(defaults, setting.name)
    if setting.name == "seed":
        return f"{config.seed_rule().removeprefix('must be ')}; not exactly {config.NAT_CODE_SEED_LENGTH} characters once `{{date}}` is filled in"
    if setting.name == "nat":
        return "any of " + ", ".join(sorted(config.NATIONALITIES))
    if setting.flag_options == config.SWITCH:
        return "the flag alone, or the variable set to true or false"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "; ".join(bounds(setting, type(value)))
    return ""


def bounds(setting, kind: type) -> list[str]:
    """The reasons Settings gives for a far too small and a far too large value, each once."""
    reasons: list[str] = []
    for probe in (-(10**12), 10**12):
        try:
            config.Settings(**{setting.name: kind(probe)})
        except config.SettingsError as exc:
            reason = str(exc).removeprefix(config.describe(setting.name) + " ").removeprefix("must be ")
            if reason not in reasons:
                reasons.append(reason)
    return reasons


def write(readme: Path = README) -> None:
    """Replace the table between the README's markers with the one the settings give."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + table() + "\n" + text[end:], encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(table())
