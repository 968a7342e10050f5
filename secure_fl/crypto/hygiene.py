"""Secret-hygiene mixin: objects that hold secret key material refuse pickling and copying."""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn


class NoPickle:
    """Refuse ``pickle`` and ``copy`` of an object holding secrets, with one clear TypeError.

    Subclasses set ``_no_pickle_message``. Exporting a secret must be a deliberate, named call
    (``private_bytes()``, ``save()``), never a side effect of serialising an object graph.
    """

    __slots__ = ()
    _no_pickle_message: ClassVar[str] = "this object holds secret keys and cannot be pickled"

    def _refuse_pickle(self) -> NoReturn:
        raise TypeError(self._no_pickle_message)

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        self._refuse_pickle()

    def __reduce__(self) -> NoReturn:
        self._refuse_pickle()

    def __getstate__(self) -> NoReturn:
        self._refuse_pickle()

    def __copy__(self) -> NoReturn:
        self._refuse_pickle()

    def __deepcopy__(self, memo: Any) -> NoReturn:
        self._refuse_pickle()
