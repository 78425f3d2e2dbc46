"""Manual champion moves (the promote DAG's one step): promote a version or roll back, from typed params."""

from __future__ import annotations

from typing import Any

from pipelines.config import Paths, load_config


def move_champion(params: dict[str, Any], actor: str, paths: Paths | None = None) -> dict[str, Any]:
    """`params`: action ("promote" | "rollback"), version (promote only), reason, force; returns the AliasMove.

    Raises registry.PromotionError (nothing moved) for a refused move or an inconsistent request.
    """
    from pipelines.registry import mlflow_client as registry

    paths = paths or Paths.from_env()
    model = load_config(params.get("profile") or "default").registry.model_name
    action, version = params.get("action"), params.get("version")
    reason, force = params.get("reason") or "", bool(params.get("force"))
    if action == registry.PROMOTE:
        if version is None:
            raise registry.PromotionRefused("action promote needs a version")
        move = registry.promote(paths, model, str(version), reason, actor, force=force)
    elif action == registry.ROLLBACK:
        if version is not None:
            raise registry.PromotionRefused(
                f"rollback goes back to the recorded previous champion; leave version empty (got {version}) or use "
                "action promote to pick a version"
            )
        move = registry.rollback(paths, model, reason, actor, force=force)
    else:
        raise registry.PromotionRefused(f"unknown action {action!r}: expected promote or rollback")
    print(move.summary())
    return move.to_dict()
