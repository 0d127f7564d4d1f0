"""Several instances: Redis, instance id, heartbeats."""

from __future__ import annotations

from pydantic import Field, SecretStr

from livecall.settings.section import Section


class ClusterSettings(Section):
    """Several instances sharing their live calls through Redis (livecall.cluster)."""

    redis_url: SecretStr | None = Field(
        None,
        validation_alias="REDIS_URL",
        description="Redis for the live-call registry and call control across instances "
        "(unset: this process only); a secret because it may carry a password",
    )
    instance_id: str | None = Field(
        None,
        validation_alias="INSTANCE_ID",
        description="this process's name in the cluster (default: host, pid and a random tail)",
    )
    cluster_prefix: str = Field(
        "livecall",
        min_length=1,
        validation_alias="CLUSTER_PREFIX",
        description="Redis key prefix: deployments sharing one Redis need different ones",
    )
    cluster_ttl_s: float = Field(
        15.0,
        gt=0,
        validation_alias="CLUSTER_TTL",
        description="a dead instance's calls vanish from listings after this many seconds",
    )
    cluster_heartbeat_s: float = Field(
        5.0,
        gt=0,
        validation_alias="CLUSTER_HEARTBEAT",
        description="how often an instance refreshes its calls in Redis (below CLUSTER_TTL)",
    )
