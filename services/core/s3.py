"""S3 for the stages that read and write objects (source-s3, persist-s3): which endpoints a
chain may name, one client factory, and errors a user can act on.

Credentials come from boto3's own chain (environment, the service's shared config and
credentials files and their profiles, web identity on Kubernetes, instance roles), never from
the chain: a chain may only name a profile the service's config already has. Endpoints are
limited by the service's settings (TILECHAIN_S3_ENDPOINT, TILECHAIN_S3_ENDPOINTS), so a chain
cannot point the service's credentials at a server of its choosing.

boto3 is imported lazily: it takes a second, and only these stages need it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc

from .config import Settings
from .params import ParamError
from .stage import StageError

CONNECT_SECONDS = 4.0  # planning asks S3 too (twice at most), and the gateway gives a Plan 10 s
READ_SECONDS = 60.0


def normal_endpoint(url: str) -> str:
    """An endpoint URL as it is compared: scheme and host lower-case, no trailing slash."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}" if parts.scheme else url.strip().rstrip("/")


@dataclass(frozen=True)
class Endpoint:
    named: str      # as the chain names it ("" = the service's default)
    url: str | None  # what the client connects to (None = AWS's own endpoints)

    def describe(self) -> str:
        return self.url or "AWS S3"


def allowed_endpoints(settings: Settings) -> dict[str, str | None]:
    """Endpoints a chain may name (normalised) -> the URL to connect to. The default one
    (TILECHAIN_S3_ENDPOINT, else AWS) is always allowed; TILECHAIN_S3_ENDPOINTS adds others,
    each `URL` or `URL=URL to connect to instead` (a chain's public name for an endpoint the
    service reaches at another address)."""
    default = settings.s3_endpoint or None
    allowed: dict[str, str | None] = {"": default}
    if default:
        allowed[normal_endpoint(default)] = default
    for entry in settings.s3_endpoints:
        named, sep, target = entry.partition("=")
        allowed[normal_endpoint(named)] = (target if sep else named).strip()
    return allowed


def resolve_endpoint(settings: Settings, named: str) -> Endpoint:
    """The endpoint for a chain's endpoint_url, or ParamError('endpoint_url')."""
    allowed = allowed_endpoints(settings)
    key = normal_endpoint(named) if named.strip() else ""
    if key not in allowed:
        names = ", ".join(k for k in allowed if k) or "none besides the default"
        raise ParamError(
            "endpoint_url",
            f"{named!r} is not an S3 endpoint this service may use (allowed: {names}; "
            f"the service's TILECHAIN_S3_ENDPOINTS setting lists them)",
        )
    return Endpoint(named, allowed[key])


def client(settings: Settings, endpoint_url: str, profile_name: str = "", region: str = "") -> Any:
    """An S3 client for a stage's endpoint_url, profile_name and region (ParamError naming the
    one that is wrong)."""
    import boto3
    import botocore.config
    import botocore.exceptions

    endpoint = resolve_endpoint(settings, endpoint_url)
    try:
        session = boto3.session.Session(profile_name=profile_name or None, region_name=region or None)
    except botocore.exceptions.ProfileNotFound:
        raise ParamError("profile_name", f"{profile_name!r} is not a profile in the service's AWS config") from None
    config = botocore.config.Config(
        connect_timeout=CONNECT_SECONDS,
        read_timeout=READ_SECONDS,
        retries={"max_attempts": 2, "mode": "standard"},
        # S3-compatible servers (SeaweedFS, MinIO, Ceph) want bucket names in the path
        s3={"addressing_style": "path" if endpoint.url else "auto"},
    )
    try:
        return session.client("s3", endpoint_url=endpoint.url, config=config)
    except ValueError as exc:  # a malformed endpoint or region
        raise ParamError("endpoint_url" if endpoint.url else "region", str(exc)) from None


def s3_error(label: str, param: str, what: str, exc: BaseException) -> Exception:
    """A boto3 failure as the error a user can act on: a missing bucket or object is the
    param's (INVALID_ARGUMENT), refused credentials PERMISSION_DENIED or UNAUTHENTICATED, an
    endpoint that does not answer UNAVAILABLE."""
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StageError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{label}: param '{param}': {what}: the service has no S3 credentials (boto3's chain: "
            "environment, AWS config and credentials files, web identity, instance role)",
        )
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError)):
        return StageError(grpc.StatusCode.UNAVAILABLE, f"{label}: param '{param}': {what}: the S3 endpoint does not answer: {exc}")
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("404", "NoSuchBucket", "NoSuchKey", "NotFound") or status == 404:
            return ParamError(param, f"{what}: not found")
        if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return StageError(grpc.StatusCode.PERMISSION_DENIED, f"{label}: param '{param}': {what}: refused by S3 ({code or status})")
    return StageError(grpc.StatusCode.UNAVAILABLE, f"{label}: param '{param}': {what}: {type(exc).__name__}: {exc}")


def check_bucket(s3: Any, bucket: str, label: str, endpoint: str) -> None:
    """The bucket exists and the credentials may use it (a HEAD: nothing is written)."""
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception as exc:
        error = s3_error(label, "bucket", f"bucket {bucket!r} at {endpoint}", exc)
        if isinstance(error, ParamError):
            raise ParamError("bucket", f"there is no bucket {bucket!r} at {endpoint}") from None
        raise error from None
