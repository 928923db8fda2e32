"""``python -m dreambooth.operator`` (also the ``dreambooth-operator`` command): run the kopf
operator with the settings from the environment (see dreambooth/operator/settings.py)."""

from __future__ import annotations

import logging
import sys


def main() -> int:
    from dreambooth.operator.settings import OperatorSettings, SettingsError

    try:
        settings = OperatorSettings.from_env()
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import kopf

    import dreambooth.operator  # noqa: F401  (its import registers the handlers)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kopf.run(
        standalone=True,  # one replica (the chart's Deployment uses the Recreate strategy)
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
