"""One file per PEFT method. Importing this package imports every module in it, and each method
module registers itself (`@jpeft.method.register`), so a new method is one new file here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
