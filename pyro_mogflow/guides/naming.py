"""Param-store names and copies of a guide: two guides never share parameters by accident.

Pyro names an autoguide's parameters after its class, so two guides of one class would share
them in the global param store. :class:`UniqueName` claims a free prefix when the guide is set
up, and gives a pickled, ``torch.load``-ed or deep-copied guide a fresh one when its name is in
use in the process that loads it.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
import weakref

from .._param_store import first_free_prefix, in_param_store

__all__ = ["UniqueName"]

#: Param-store prefixes held by live guides (name -> guide), so a guide set up after
#: ``pyro.clear_param_store()`` never takes the name of a guide that is still in use.
_LIVE_NAMES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class UniqueName:
    """Mixin for a Pyro autoguide: a param-store prefix of its own, and safe copies.

    The class using it sets ``self._explicit_name`` (``None`` or a user's name) before set-up
    and calls :meth:`_claim_name` once it creates parameters.
    """

    _explicit_name: str | None
    _pyro_name: str

    @property
    def name(self) -> str:
        """The prefix of this guide's parameters in Pyro's param store (claimed at set-up)."""
        return self._pyro_name

    def _name_taken(self, prefix: str) -> bool:
        holder = _LIVE_NAMES.get(prefix)
        if holder is not None and holder is not self:
            return True
        return in_param_store(prefix)

    def _claim_name(self, rename: bool = False) -> None:
        """Take a param-store prefix no other guide uses; ``rename``: derive one, never raise."""
        base = self._explicit_name
        if base is not None and not rename:
            if self._name_taken(base):
                raise ValueError(
                    f"name={base!r} already has parameters in Pyro's param store or belongs to "
                    "another live guide; two guides would share them. Pass another name or call "
                    "pyro.clear_param_store()."
                )
            prefix = base
        else:
            prefix = first_free_prefix(base or type(self).__name__, self._name_taken)
        self._pyro_name = prefix
        _LIVE_NAMES[prefix] = self

    # ------------------------------------------------------------- pickling
    def __getstate__(self):
        # Pyro's AutoGuide.__getstate__ drops the model reference *on the guide itself*, so
        # torch.save(guide) breaks the guide it saves. Pickle a copy of the state instead.
        saved = (self._model, self.master)
        try:
            state = dict(super().__getstate__())
        finally:
            self._model, self.master = saved
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.prototype_trace is not None:
            # A copy in a process where the original (or its parameters) lives must not adopt
            # the original's parameters through the shared param store.
            if self._name_taken(self._pyro_name):
                self._claim_name(rename=True)
            else:
                _LIVE_NAMES[self._pyro_name] = self

    def __deepcopy__(self, memo):
        # Plain deepcopy fails on the flows' caches (non-leaf tensors); pickle copies them.
        # Functions (the model, a temperature schedule, a flow callable) are shared, as
        # deepcopy shares them.
        shared: list = []

        class _Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, (types.FunctionType, functools.partial)):
                    shared.append(obj)
                    return len(shared) - 1
                return None

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid):
                return shared[pid]

        buffer = io.BytesIO()
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(self)
        buffer.seek(0)
        new = _Unpickler(buffer).load()
        new._model = self._model
        memo[id(self)] = new
        return new
