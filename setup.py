"""Package layout, discovered (everything else is in pyproject.toml).

`convert/` and `models/` sit at the top of the repository, so the folder listing reads like
the architecture, but install inside the `localgemma` namespace (`localgemma.convert`,
`localgemma.models`), never as generic top-level modules called `convert` or `models`.
Every package under each root is found here, so a new subpackage cannot be left out of the
wheel (tests/test_install.py checks the installed files against the source tree).
"""

from setuptools import find_packages, setup

ROOTS = {"localgemma": "localgemma", "localgemma.convert": "convert", "localgemma.models": "models"}

packages = []
for name, folder in ROOTS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=ROOTS)
