"""The editing methods, one file each, and what they share.

* :mod:`~hf_knowedit.methods.registry`: ``register_method``; how a method plugs into ``apply_edits``.
* :mod:`~hf_knowedit.methods.config`: one validated vocabulary of hyper-parameters (``EditConfig``).
* :mod:`~hf_knowedit.methods.keys`, :mod:`~hf_knowedit.methods.targets`: the keys ``k*`` and the
  target vectors ``v*``/``z`` every locate-and-edit method needs.
* :mod:`~hf_knowedit.methods.context`: context templates; :mod:`~hf_knowedit.methods.statistics`:
  computing second moments ``C``; :mod:`~hf_knowedit.methods.solvers`: the closed-form solves.
* The methods: :mod:`~hf_knowedit.methods.rome`, :mod:`~hf_knowedit.methods.memit`,
  :mod:`~hf_knowedit.methods.alphaedit`, :mod:`~hf_knowedit.methods.emmet`,
  :mod:`~hf_knowedit.methods.encore`, :mod:`~hf_knowedit.methods.rlsedit` (lifelong) and
  :mod:`~hf_knowedit.methods.moeedit` (routed mixture-of-experts blocks);
  NAS (:mod:`~hf_knowedit.methods.nas`) is an option of the MEMIT family.

Adding a method = one file here ending in ``register_method(...)`` and its name in
``registry.BUILTIN``. The core of the library (edit sets, the stack, adapters) never imports this
package; ``apply_edits`` reaches methods only through the registry.
"""

from .alphaedit import AlphaEditConfig
from .config import EditConfig, ReferenceConfig
from .emmet import EMMETConfig
from .encore import ENCOREConfig
from .memit import MassEditConfig, MEMITConfig
from .moeedit import MoEEditConfig
from .registry import EditContext, MethodResult, available_methods, get_method, register_method
from .rlsedit import RLSEditConfig
from .rome import ROMEConfig

__all__ = [
    "AlphaEditConfig",
    "EMMETConfig",
    "ENCOREConfig",
    "EditConfig",
    "EditContext",
    "MEMITConfig",
    "MassEditConfig",
    "MoEEditConfig",
    "MethodResult",
    "RLSEditConfig",
    "ROMEConfig",
    "ReferenceConfig",
    "available_methods",
    "get_method",
    "register_method",
]
