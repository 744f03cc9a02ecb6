#!/usr/bin/env python3
"""Generates a synthetic fleet repository for the bundler benchmark.

    gen_fleet.py --devices 10000 --apps 20 --out DIR

Every device runs every app (the worst case): each app delivers one templated config
file and one static file, and runs two Compose services; the first quarter of the apps
use ${VAR} interpolation from device variables (translated per device), the rest are
device-independent. Deterministic: the same arguments give the same files.
"""
import argparse
import os
import random

SITES = [f"site-{i:02d}" for i in range(50)]
HARDWARE = ["rpi4", "cm4", "x86"]


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--apps", type=int, default=20)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rng = random.Random(42)
    out = a.out

    write(f"{out}/fleet.yaml", "name: bench\nbundle_expiry: 90d\nvars:\n  log_level: info\n  mqtt_host: broker.bench.example\n")
    for i in range(a.devices):
        site = rng.choice(SITES)
        hw = rng.choice(HARDWARE)
        channel = "canary" if i % 20 == 0 else "stable"
        write(
            f"{out}/devices/dev-{i:05d}.yaml",
            f"labels:\n  site: {site}\n  hardware: {hw}\n  channel: {channel}\n"
            f"vars:\n  location: \"{site} rack {i % 40}\"\n  port: {8000 + i % 1000}\n  serial: SN{i:08d}\n",
        )
    templated = max(1, a.apps // 4)
    for j in range(a.apps):
        app = f"app-{j:02d}"
        selector = "selector:\n  hardware: [rpi4, cm4, x86]\n" if j % 2 else ""
        write(
            f"{out}/apps/{app}/app.yaml",
            f"description: synthetic app {j}\n{selector}files:\n"
            f"  - source: files/{app}.conf\n    template: true\n"
            f"  - source: files/static.txt\n    target: /etc/bench/{app}/static.txt\n",
        )
        write(
            f"{out}/apps/{app}/files/{app}.conf",
            f"# {app} for {{{{ device.id }}}} at {{{{ device.vars.location }}}}\n"
            f"[service]\nname = \"{app}\"\ndevice = \"{{{{ device.id }}}}\"\nserial = \"{{{{ device.vars.serial }}}}\"\n"
            f"site = \"{{{{ device.labels.site }}}}\"\nhardware = \"{{{{ device.labels.hardware }}}}\"\n"
            f"log_level = \"{{{{ device.vars.log_level }}}}\"\nbroker = \"{{{{ device.vars.mqtt_host }}}}\"\n"
            + "".join(f"option_{k} = {k * 7 + j}\n" for k in range(12)),
        )
        write(f"{out}/apps/{app}/files/static.txt", f"static content of {app}\n" * 8)
        env_port = "${port}" if j < templated else str(9000 + j)
        write(
            f"{out}/apps/{app}/compose.yaml",
            f"""services:
  main:
    image: registry.bench.example/{app}/main:1.{j}@sha256:{j:064x}
    command: ["--config", "/etc/{app}/{app}.conf"]
    environment:
      PORT: "{env_port}"
      APP: {app}
    ports:
      - "{10000 + j}:{env_port}"
    volumes:
      - ./files/{app}.conf:/etc/{app}/{app}.conf:ro
      - data:/var/lib/{app}
    depends_on:
      sidecar:
        condition: service_healthy
    restart: unless-stopped
    mem_limit: 64m
  sidecar:
    image: registry.bench.example/{app}/sidecar:2.{j}@sha256:{j + 1000:064x}
    healthcheck:
      test: ["CMD", "/bin/health"]
      interval: 10s
      timeout: 2s
      retries: 3
    restart: unless-stopped
volumes:
  data:
""",
        )


if __name__ == "__main__":
    main()
