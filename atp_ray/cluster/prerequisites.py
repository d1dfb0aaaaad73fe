"""What a cluster verb needs on this machine, checked before anything starts; each names what is missing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from atp_ray.errors import ClusterError


def project_root() -> Path:
    """The atp-ray checkout that jobs upload as their working dir."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ClusterError(
            f"jobs upload the atp-ray checkout, but {root} is not one (no pyproject.toml): run from a git clone"
        )
    return root


def ray_cli() -> str:
    """The ``ray`` command of this Python environment (or of PATH)."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError(
            "the `ray` command is not installed: pip install 'atp-ray[cluster]' (it brings ray[default])"
        )
    return found


def require_job_api() -> None:
    """Job submission talks to the Ray dashboard, which needs ray's ``default`` extra."""
    import importlib.util

    missing = [m for m in ("aiohttp", "aiohttp_cors", "opencensus") if importlib.util.find_spec(m) is None]
    if missing:
        raise ClusterError(
            f"Ray job submission needs the dashboard, whose packages are missing ({', '.join(missing)}): "
            "pip install 'atp-ray[cluster]'"
        )


def require_cloud_credentials(provider: str) -> None:
    """Fail early when ``ray up``/``ray down`` could not reach the provider's API."""
    import importlib.util

    if provider == "aws":
        if importlib.util.find_spec("boto3") is None:
            raise ClusterError("provider aws: `ray up` needs boto3 on this machine: pip install boto3")
        import boto3

        if boto3.session.Session().get_credentials() is None:
            raise ClusterError(
                "provider aws: no AWS credentials found (run `aws configure`, or set AWS_PROFILE "
                "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )
    elif provider == "gcp":
        if importlib.util.find_spec("googleapiclient") is None or importlib.util.find_spec("google.auth") is None:
            raise ClusterError(
                "provider gcp: `ray up` needs google-api-python-client: pip install google-api-python-client"
            )
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError as err:
            raise ClusterError(
                f"provider gcp: no Google credentials found ({err}); run `gcloud auth application-default login`"
            ) from None
    else:
        raise ClusterError(f"provider.type: atp-ray ships configs for aws and gcp, got {provider!r}")
