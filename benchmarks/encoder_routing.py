"""Prefix-cache hit rate with two TextEncoder replicas: affinity routing vs Ray's default.

Each TextEncoder replica has its own prefix cache. With Serve's default router
(power of two choices) every replica ends up caching every namespace template; with
`deployments.text_encoder.router:PrefixAffinityRouter` a template's requests go to one replica,
so the two caches split the templates between them. The difference shows when the
templates do not all fit in one replica's budget.

Workload (the same, by seed, for both routers): `--templates` namespaces, each with a
template of ~40 tokens (two full 16-token blocks); every request is one template plus a
unique suffix, and the default negative prompt. Requests are sent through a Serve handle
from this process with `--concurrency` in flight. Reported per router: the share of
prompt window positions served from cache, the share of requests whose template blocks
hit, and the requests per second.

    .venv/bin/python -m benchmarks.encoder_routing [--quick] [--update-readme README.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import UTC, datetime

from benchmarks.readme_table import command_line, publish, results_path

SECTION = "encoder_routing"
ROUTER = "deployments.text_encoder.router:PrefixAffinityRouter"


def workload(tokenizer, templates: int, requests: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, namespace, routing key) per request; templates drawn with a skew (hot and cold ones)."""
    from deployments.prompt.optimizer import routing_key_for

    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 6]
    words = sorted(w[:-4] for w in words)

    def phrase(count: int) -> str:
        return " ".join(rng.choice(words) for _ in range(count))

    texts = [phrase(40) for _ in range(templates)]
    out = []
    for _ in range(requests):
        index = min(int(rng.expovariate(3.0 / templates)), templates - 1)
        namespace = f"template-{index}"
        prompt = f"{texts[index]}, {phrase(12)}"
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        out.append((prompt, namespace, routing_key_for(ids, namespace)))
    return out


async def drive(handle, requests, concurrency: int) -> tuple[list, float]:
    semaphore = asyncio.Semaphore(concurrency)
    negative = "blurry, deformed eyes, asymmetrical face, bad anatomy, low quality"

    async def one(prompt, namespace, key):
        async with semaphore:
            return await handle.encode.remote([prompt, negative], namespace=namespace, routing_key=key)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(*r) for r in requests))
    return results, time.perf_counter() - start


def run(options) -> dict:
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from deployments.models import loading
    from deployments.text_encoder import deployment as text_encoder

    model_path = loading.resolve_model("tiny")
    tokenizer = loading.load_tokenizer(model_path)
    requests = workload(tokenizer, options.templates, options.requests, seed=0)
    settings = {
        "cache": {"max_mib": options.max_mib, "exact_prompts": True, "watchdog": {"enabled": False}},
        "batch": {"max_batch_size": 8, "batch_wait_timeout_s": 0.002},
    }
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows = []
    try:
        for router in ("default", "affinity"):
            options_ = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.2}, "max_ongoing_requests": 16}
            if router == "affinity":
                options_["request_router_config"] = RequestRouterConfig(
                    request_router_class=ROUTER, request_router_kwargs={"busy_threshold": options.busy_threshold}
                )
            app = text_encoder.build_deployment().options(**options_).bind(str(model_path), 1, settings)
            handle = serve.run(app, name=f"routing-{router}", route_prefix=None)
            asyncio.run(drive(handle, requests[:8], options.concurrency))  # start-up costs, not counted
            results, seconds = asyncio.run(drive(handle, requests[8:], options.concurrency))
            measured = requests[8:]
            cached = [r.cached_tokens[0] for r in results]
            rows.append(
                {
                    "router": router,
                    "requests": len(measured),
                    "seconds": round(seconds, 3),
                    "rps": round(len(measured) / seconds, 2),
                    "prompt_cached_share": round(sum(cached) / (77 * len(cached)), 4),
                    "template_hit_share": round(sum(c >= 32 for c in cached) / len(cached), 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            serve.delete(f"routing-{router}")
    finally:
        ray.shutdown()
    return {
        "rows": rows,
        "config": {
            "templates": options.templates,
            "requests": options.requests,
            "concurrency": options.concurrency,
            "max_mib_per_replica": options.max_mib,
            "replicas": 2,
            "busy_threshold": options.busy_threshold,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command_line("benchmarks.encoder_routing"),
        },
    }


def markdown(results: dict) -> str:
    lines = [
        "| router | requests | prompt positions from cache | requests hitting their template | rps |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['router']} | {r['requests']} | {r['prompt_cached_share']:.0%} "
            f"| {r['template_hit_share']:.0%} | {r['rps']:.1f} |"
        )
    c = results["config"]
    lines += [
        "",
        f"2 TextEncoder replicas (tiny model), {c['max_mib_per_replica']} MiB cache each, {c['templates']} "
        f"namespace templates (skewed), concurrency {c['concurrency']}, affinity spill at "
        f"{c['busy_threshold']} in flight; {c['date'][:10]}; `{c['command'].strip()}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from deployments.text_encoder.router import DEFAULT_BUSY_THRESHOLD

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--templates", type=int, default=48)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-mib", type=float, default=4.0, help="cache budget per replica")
    parser.add_argument(
        "--busy-threshold",
        type=int,
        default=DEFAULT_BUSY_THRESHOLD,
        help="the affinity router's spill point (default: the router's, %(default)s)",
    )
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]encoder_routing.json)")
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    if options.quick:
        options.requests = 200
    results = run(options)
    json_path = results_path(SECTION, options.quick, options.json)
    publish(results, json_path, markdown(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
