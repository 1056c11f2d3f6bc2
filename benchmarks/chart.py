"""The PNG: latency percentiles and fan-out time per strategy (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"mapping": "#1f77b4", "groups": "#ff7f0e"}
#: Target 4's rows, in chart order.
BOOKKEEPING = {
    "pair": "connect + disconnect",
    "register": "connect",
    "unregister": "disconnect",
    "floor/pair": "bare-client floor (pair)",
    "pair/orm": "ORM path (pair)",
}


def _bars(axis, labels: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False) -> None:
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        color = COLORS.get(name.split(" ")[0])
        hatch = "//" if name.endswith("p99") else None
        axis.bar(positions, [v if v is not None else 0 for v in values], width, label=name, color=color,
                 hatch=hatch, edgecolor="white")  # fmt: skip
    axis.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    if log:
        axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)


def _percentiles(data: dict, keys: list[str]) -> dict:
    return {f"{s} {p}": [data[k][s][p] for k in keys] for s in ("mapping", "groups") for p in ("p50", "p99")}


def _label(key: str) -> str:
    """'default/3/orm' -> 'redis, 3 ch, ORM path'."""
    parts = key.replace("default", "redis").split("/")
    text = f"{parts[0]}, {parts[1]} ch"
    return text + (", ORM path" if len(parts) > 2 else "")


def _missing(axis) -> None:
    axis.text(0.5, 0.5, "not run", ha="center", transform=axis.transAxes)


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(2, 3, figsize=(19, 10))
    meta = results["meta"]
    title = f"channel_registry: mapping vs groups — {meta['when']} UTC, library {meta['library_sources_sha256']}"
    figure.suptitle(title + (" (quick)" if meta["quick"] else ""), fontsize=12)
    tables = results["targets"]

    axis = axes[0][0]
    axis.set_title("1 · send_to_user latency, lookup included (ms, log scale)\ntarget: mapping ≤ groups on redis")
    if "1" in tables:
        data = tables["1"]["data"]
        keys = [k for k in data if "/" in k]
        _bars(axis, [_label(k) for k in keys], _percentiles(data, keys), "ms", log=True)
    else:
        _missing(axis)

    axis = axes[0][1]
    axis.set_title("2 · fan-out of one event, p50 (ms, log scale)\ntarget: mapping ≥ 20x faster on redis")
    if "2" in tables:
        data = tables["2"]["data"]
        cases = [k for k in data if "/" in k]
        labels = [f"{k.replace('default', 'redis').split('/')[0]}, {int(k.split('/')[1]):,} users" for k in cases]
        _bars(axis, labels, {s: [data[k][s]["p50"] for k in cases] for s in ("mapping", "groups")}, "ms", log=True)
    else:
        _missing(axis)

    axis = axes[0][2]
    axis.set_title("3 · 200 concurrent senders, one process (messages/s)\ntarget: mapping ≥ groups")
    if "3" in tables:
        data = tables["3"]["data"]
        names = list(data)
        axis.bar(names, [data[n]["per_second"] for n in names],
                 color=[COLORS["groups" if n.startswith("groups") else "mapping"] for n in names])  # fmt: skip
        for i, name in enumerate(names):
            errors = sum(data[name]["errors"].values())
            axis.text(i, data[name]["per_second"], f"{data[name]['per_second']:,.0f}/s" +
                      (f"\n{errors:,} errors" if errors else ""), ha="center", va="bottom", fontsize=8)  # fmt: skip
        axis.set_ylabel("messages/s")
        axis.tick_params(axis="x", labelsize=8)
    else:
        _missing(axis)

    axis = axes[1][0]
    axis.set_title("4 · connect + disconnect bookkeeping (ms, log scale)\ntarget: mapping ≤ 2x groups")
    if "4" in tables:
        data = tables["4"]["data"]
        keys = [k for k in BOOKKEEPING if k in data]
        _bars(axis, [BOOKKEEPING[k] for k in keys], _percentiles(data, keys), "ms", log=True)
    else:
        _missing(axis)

    axis = axes[1][1]
    axis.set_title("6 · send_to_user before / during prune_stale() (ms)\ntarget: p99 < 10 ms while the prune runs")
    if "6" in tables:
        data = tables["6"]["data"]
        _bars(axis, ["before prune", "during prune"],
              {"mapping p50": [data["before"]["p50"], data["during"]["p50"]],
               "mapping p99": [data["before"]["p99"], data["during"]["p99"]]}, "ms")  # fmt: skip
        axis.axhline(10, color="red", linewidth=0.8, linestyle="--", label="target: p99 < 10 ms")
        axis.legend(fontsize=8)
    else:
        _missing(axis)

    axis = axes[1][2]
    axis.set_title("channels_redis#221 · layer sharded over 2 Redis servers\nchannels reached (%)")
    if "sharding" in tables:
        received, sent = tables["sharding"]["data"]["received"], tables["sharding"]["data"]["channels"]
        names = list(received)
        shares = [100 * received[n] / sent for n in names]
        colors = {"send_many (mapping)": COLORS["mapping"], "group_send": COLORS["groups"]}
        axis.bar(names, shares, color=[colors.get(n, "grey") for n in names])
        for i, share in enumerate(shares):
            axis.text(i, share, f"{share:.1f} %", ha="center", va="bottom", fontsize=8)
        axis.set_ylim(0, 110)
        axis.set_ylabel(f"% of {sent:,} channels reached")
        axis.tick_params(axis="x", labelsize=8)
    else:
        _missing(axis)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def draw_load(report: dict, path: Path) -> None:
    """``make load``: best steady rate per setup, and p50/p99 latency at that rate."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    setups = report["setups"]
    names = list(setups)
    best = [setups[n]["best"] or {} for n in names]
    figure, (rates, latency) = pyplot.subplots(1, 2, figsize=(14, 5.5))
    meta = report["meta"]
    figure.suptitle(f"make load — one server process, {meta['config']['connections']:,} sockets, "
                    f"{meta['cpus']} CPUs — {meta['when']}", fontsize=11)  # fmt: skip
    colors = ["#1f77b4" if n == "library" else "#7f7f7f" for n in names]
    values = [b.get("messages_per_second", 0) for b in best]
    rates.bar(names, values, color=colors)
    for i, value in enumerate(values):
        rates.text(i, value, f"{value:,.0f}/s" if value else "none passed", ha="center", va="bottom", fontsize=8)
    rates.set_title(f"highest steady rate with p99 ≤ {meta['config']['p99_ms']:g} ms and 0 lost (messages/s)")
    rates.set_ylabel("messages/s (copies = 2x)")
    rates.grid(axis="y", alpha=0.3)
    _bars(latency, names, {"p50": [b.get("latency_ms", {}).get("p50") for b in best],
                           "p99": [b.get("latency_ms", {}).get("p99") for b in best]}, "ms")  # fmt: skip
    latency.set_title("delivery latency at that rate (ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
