"""What a run costs on a Cloud TPU slice: chip-hours at the price table's USD per chip-hour.

launch/prices.toml is the shipped table (per TPU family and region, on demand and Spot, with the pages it comes from
and its date). Prices change: a user's table in the same format (`--prices FILE`) replaces the shipped entries region
by region, and its `source` and `date` describe what it gives. cost = seconds x chips / 3600 x price per chip-hour.
"""
from __future__ import annotations

import dataclasses
import pathlib
import tomllib
import storage

SHIPPED = pathlib.Path(__file__).with_name("prices.toml")
KEYS = ("source", "spot_source", "date")


@dataclasses.dataclass(frozen=True)
class Price:
    """USD per chip-hour of one TPU family in one region (spot None: no Spot price given)."""
    family: str
    region: str
    on_demand: float
    spot: float | None
    source: str

    def cost(self, chip_hours: float) -> tuple[float, float | None]:
        """(on-demand, spot) USD of `chip_hours`."""
        return chip_hours * self.on_demand, None if self.spot is None else chip_hours * self.spot

    def describe(self) -> str:
        spot = "no Spot price" if self.spot is None else f"${self.spot:.2f} Spot"
        return (f"{self.family} in {self.region}: ${self.on_demand:.2f} on demand, {spot} per chip-hour ({self.source}; "
                "prices change: --prices FILE gives your own)")


def _read(text: str, where: str) -> dict[str, dict[str, Price]]:
    """{family: {region: Price}} of one table; ValueError naming `where` and the key."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not TOML: {e}") from None
    source = f"{where}, {table.get('source', 'no source named')}, {table.get('date', 'undated')}"
    out: dict[str, dict[str, Price]] = {}
    for family, regions in table.items():
        if family in KEYS:
            continue
        if not isinstance(regions, dict) or not regions:
            raise ValueError(f"{where}: [{family}] must hold one table per region, e.g. [{family}.us-east5]")
        for region, entry in regions.items():
            key = f"{family}.{region}"
            if not isinstance(entry, dict) or set(entry) - {"on_demand", "spot"} or "on_demand" not in entry:
                raise ValueError(f"{where}: [{key}] takes on_demand (required) and spot, USD per chip-hour")
            values = [entry["on_demand"], entry.get("spot", 0.0)]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
                raise ValueError(f"{where}: [{key}] prices must be non-negative numbers, got {entry}")
            out.setdefault(family, {})[region] = Price(family, region, float(entry["on_demand"]),
                                                       None if "spot" not in entry else float(entry["spot"]), source)
    return out


def table(user_file: str | None = None) -> dict[str, dict[str, Price]]:
    """The shipped table with a user's entries (a local or gs:// TOML file) in place of the shipped ones."""
    prices = _read(SHIPPED.read_text(), "launch/prices.toml")
    if user_file:
        path = storage.Path(user_file)
        if not path.is_file():
            raise ValueError(f"--prices {user_file}: no such file")
        for family, regions in _read(path.read_text(), user_file).items():
            prices.setdefault(family, {}).update(regions)
    return prices


def family(topology_name: str) -> str:
    """`v5p:2x2x1` -> `v5p`."""
    return topology_name.split(":", 1)[0]


def lookup(topology_name: str, region: str | None = None, user_file: str | None = None) -> Price:
    """The price of a chip of `topology_name`'s family in `region` (default: the family's first region)."""
    prices = table(user_file).get(family(topology_name))
    if not prices:
        raise ValueError(f"--topology {topology_name}: no price for TPU family {family(topology_name)!r} "
                         f"(launch/prices.toml{', ' + user_file if user_file else ''}); give one with --prices FILE")
    if region is None:
        return next(iter(prices.values()))
    if region not in prices:
        raise ValueError(f"--region {region}: no {family(topology_name)} price there; regions priced: "
                         f"{', '.join(prices)} (or give one with --prices FILE)")
    return prices[region]


def usd(amount: float | None) -> str:
    """'-', '$0.0123', '$12.35' or '$1,235' (one word, for tables)."""
    if amount is None:
        return "-"
    return f"${amount:.3g}" if amount < 1 else (f"${amount:,.2f}" if amount < 1000 else f"${amount:,.0f}")


def duration(seconds: float | None) -> str:
    """'-', '42s', '3.5min' or '2.1h' (one word, for tables)."""
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f}min" if seconds < 5400 else f"{seconds / 3600:.1f}h"
