"""The store's Lua scripts, as Redis runs them.

Each script is a file of ``lua/``, named for what it does; its header states its KEYS, ARGV
and reply. Constants reach a script as ARGV, never by editing its text, so the text Redis
caches (by its SHA1) is the file's.

Shared pieces live in ``lua/includes/`` and are put in front of a script's own text when it
is loaded (``source``): Lua has no ``require`` inside Redis, and one copy of each piece keeps
the scripts that use it alike.

- ``includes/fence.lua``, the erasure fence, opens every script that writes a user's keys
  (``FENCED``): the caller sends the fence zset of the user's slot as the script's LAST key
  and (user digest, time the call started) as its FIRST two ARGV. The fence takes them off
  ``KEYS`` and ``ARGV`` before the script's own text runs, so the KEYS and ARGV a script's
  header states are those that remain; a fenced script may also answer ``ERASED``.
- ``includes/merge_attributes.lua`` and ``includes/claim_request.lua`` each define one local
  function, used by the scripts ``INCLUDES`` names. They read no KEYS or ARGV of their own.

The fence goes first, the functions next, the script's own text last. A store registers
each script once with ``client.register_script``, which keeps its SHA1 and sends EVALSHA
(falling back to loading the script).
"""

from __future__ import annotations

import functools
from importlib import resources

#: What a fenced script answers when the user was erased while its call was in flight
#: (``includes/fence.lua``): nothing was written.
ERASED = "erased"

#: The scripts that write a user's keys: each opens with the erasure fence.
FENCED = frozenset(
    {
        "add_cooldowns",
        "consume_contacts",
        "import_profile",
        "log_decision",
        "record_signals",
        "set_attributes",
        "set_preferences",
    }
)

#: The functions each script uses, from ``lua/includes/``.
INCLUDES: dict[str, tuple[str, ...]] = {
    "consume_contacts": ("claim_request",),
    "log_decision": ("claim_request",),
    "set_attributes": ("merge_attributes",),
    "import_profile": ("merge_attributes",),
}


@functools.cache
def _read(path: str) -> str:
    return resources.files("tactful.store").joinpath("lua", path).read_text(encoding="utf-8")


def unfenced(name: str) -> str:
    """The script ``lua/<name>.lua`` with the functions it uses, without the fence."""
    parts = [_read(f"includes/{include}.lua") for include in INCLUDES.get(name, ())]
    return "\n".join([*parts, _read(f"{name}.lua")])


def source(name: str) -> str:
    """The script ``lua/<name>.lua`` as Redis runs it: opened by the erasure fence when it is
    one of ``FENCED``, then the functions it uses, then its own text."""
    if name in FENCED:
        return "\n".join([_read("includes/fence.lua"), unfenced(name)])
    return unfenced(name)


#: The caps script on its own keys, without the fence (for running it on a bare hash).
CONSUME_CONTACTS_LUA = unfenced("consume_contacts")
