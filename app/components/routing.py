"""The `router:` key that Processor, Router and VllmWorker share."""

from typing import Annotated

from pydantic import AfterValidator


def _known_policy(name: str) -> str:
    # Imported when a config is validated, not when a component module is imported.
    from app.router.policies import POLICIES

    if name not in POLICIES:
        raise ValueError(f"unknown router policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return name


# A policy of app.router.policies.POLICIES; for the Processor, kv-based ones mean "ask the Router".
RouterPolicyName = Annotated[str, AfterValidator(_known_policy)]
