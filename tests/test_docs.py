"""README's tables say what the code says: the error table is localgemma/errors.py, the settings table localgemma/settings.py."""

import re
from pathlib import Path

from localgemma import errors

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `(\w+)` \| [^|]+ \| (\d+)(?: \(OpenAI: (\d+)\))? \| (\d+) \| (\w+)(?: \((\w+)\))? \|$")


def test_the_readme_error_table_is_the_error_module():
    rows = {m[1]: m.groups()[1:] for m in map(ROW.match, README.read_text().splitlines()) if m}
    assert set(rows) == {cls.__name__ for cls in errors.ERRORS}, set(rows) ^ {c.__name__ for c in errors.ERRORS}
    for cls in errors.ERRORS:
        status, openai_status, code, openai_type, openai_code = rows[cls.__name__]
        assert (int(status), int(code), openai_type) == (cls.status, cls.code, cls.openai_type), cls.__name__
        assert (int(openai_status) if openai_status else None) == cls.openai_status, cls.__name__
        assert openai_code == cls.openai_code, cls.__name__


def test_every_error_class_is_in_the_table():
    """No module defines an error of its own: every subclass anywhere is one of ERRORS."""
    import localgemma.convert  # noqa: F401 - load every module that could define one
    import localgemma.runtime  # noqa: F401
    import localgemma.server.app  # noqa: F401

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    assert set(subclasses(errors.LocalGemmaError)) == set(errors.ERRORS)


def test_the_readme_settings_table_is_the_settings_module():
    from localgemma.settings import Settings, env_var

    rows = re.findall(r"^\| (\w+) \| `(LOCALGEMMA_\w+)` \|", README.read_text(), re.M)
    documented = dict(rows)
    assert set(documented) == set(Settings.model_fields) - {"models", "preload"}
    assert all(env == env_var(name) for name, env in documented.items())
