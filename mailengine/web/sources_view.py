"""The sending sources (sources.py) as the web admin's Status page, status.json and /metrics
show them: each source's address and EHLO name, its pools and weights, its reverse DNS problem,
the connections open from it and today's warm-up per provider (sent / allowed).

Everything comes from memory: the delivery engine's Sources (rules, the day's counts, every
engine's when shared, the rDNS check's result) and its connection pool; nothing is read from
disk or Redis per request.
"""
from __future__ import annotations


def rows(engine) -> list[dict]:
    """One dict per source, in the file's order; [] without sources."""
    d = getattr(engine, "delivery", None)
    if d is None or not d.sources.enabled:
        return []
    src = d.sources
    conns = d.pool.per_source()
    default = src.rules.default_pool
    out = []
    for u in src.usage():
        name = u["source"]
        pools = [{"pool": p, "weight": w, "default": p == default}
                 for p, w in src.pools_of(name)]
        today = [{"provider": p, "sent": t["used"], "limit": t["limit"],
                  "text": f"{p} {t['used']} / {'no cap' if t['limit'] is None else t['limit']}"}
                 for p, t in u["today"].items()]
        checked, problem = name in src.rdns, src.rdns.get(name)
        out.append({
            "source": name, "ip": u["ip"], "helo": u["helo"], "pools": pools,
            "pools_text": _pools_text(pools, bool(src.rules.pools), bool(default)),
            "rdns_checked": checked, "rdns_problem": problem,
            "rdns_text": (problem or "names its EHLO name") if checked else "not checked yet",
            "connections": conns.get(name, 0),
            "warmup_day": u["warmup_day"], "warmed": u["warmed"],
            "limit": u["limit"],  # today's volume for a provider without its own ramp
            "warmup_text": _warmup_text(u),
            "today": today,
        })
    return out


def _pools_text(pools: list[dict], any_pool: bool, default: bool) -> str:
    """What the pools column says: pool ×weight, each pool the source is in."""
    if not any_pool:
        return "no pools: every source at weight 1"
    if not pools:  # mail of no pool (no default_pool, no sender_pools entry) uses every source
        return "in no pool: not used (default_pool is set)" if default else \
            "in no pool: only mail of no pool uses it"
    return ", ".join(f"{p['pool']} ×{p['weight']}" + (" (default)" if p["default"] else "")
                     for p in pools)


def _warmup_text(u: dict) -> str:
    if u["warmed"]:
        return "warmed up"
    cap = f"{u['limit']} a provider today" if u["limit"] is not None else "no cap by default"
    return f"day {u['warmup_day']}: {cap}"
