from .compat import import_sat as _import_sat

_import_sat()
