"""What the AWS backends share: importing boto3 (with an install hint that
works for an installed package and for a single-file user alike), making a
client with short timeouts and retries, and saying in one line why a call
failed."""

import os

from tcpproxy import BackendError, ConfigError

__all__ = ["import_boto3", "make_client", "aws_reason",
           "CONNECT_TIMEOUT", "READ_TIMEOUT", "MAX_ATTEMPTS"]

# Timeouts and retries of one API call.  The poller retries a failed poll
# itself, so botocore's own retries are kept short; AWS_MAX_ATTEMPTS and
# AWS_RETRY_MODE (or the config file) still override them.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0
MAX_ATTEMPTS = 3


def import_boto3(backend):
    """Return the (boto3, botocore) modules; BackendError with the fix when
    boto3 is missing."""
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
        import botocore.session
    except ImportError:
        raise BackendError("the %s backend needs boto3: pip install boto3 (or, for the "
                           "installed package, pip install 'tcpproxy[aws]')" % backend) from None
    return boto3, botocore


def _configured(core, variable, key):
    """True when the user set *key* in the environment or the AWS config file."""
    if os.environ.get(variable):
        return True
    try:
        return key in core.get_scoped_config()
    except Exception:  # noqa: BLE001 - a broken AWS config file: not set by the user
        return False


def make_client(service, region=None):
    """Return a boto3 client for *service* with short timeouts and retries.

    The region is *region* or the standard chain (AWS_REGION,
    AWS_DEFAULT_REGION, the config file); the endpoint and credentials are the
    standard chain's.  Raises ConfigError when no region is configured.
    """
    boto3, botocore = import_boto3(service)
    core = botocore.session.get_session()
    session = boto3.session.Session(botocore_session=core, region_name=region or None)
    if not session.region_name:
        raise ConfigError("%s: no AWS region configured: pass --region or set AWS_REGION"
                          % service)
    retries = {}
    if not _configured(core, "AWS_RETRY_MODE", "retry_mode"):
        retries["mode"] = "standard"
    if not _configured(core, "AWS_MAX_ATTEMPTS", "max_attempts"):
        retries["total_max_attempts"] = MAX_ATTEMPTS
    config = botocore.config.Config(connect_timeout=CONNECT_TIMEOUT,
                                    read_timeout=READ_TIMEOUT,
                                    retries=retries or None)
    return session.client(service, config=config)


def aws_reason(exc):
    """One line saying why an AWS call failed."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        code = error.get("Code", "Error")
        message = error.get("Message") or ""
        return ("%s: %s" % (code, message)).rstrip(": ")
    return "%s: %s" % (type(exc).__name__, exc)
