"""Live tunables: typed declarations (each owned by the package that reads it), the
validated watch services read them through, and the `tandem <group> set|show|reset` CLI.

The base layer reaches up to nothing: the runtime's `Discovery` comes in as an argument
(the source of values, and the CLI's store, connected only when a command runs), and
the declarations come from their owners.
"""

from app.tunables.declaration import InvalidTunableError, Tunable, TunableGroup
from app.tunables.live import LiveTunables, TunablesFeed, TunablesSource

__all__ = ["InvalidTunableError", "LiveTunables", "Tunable", "TunableGroup", "TunablesFeed", "TunablesSource"]
