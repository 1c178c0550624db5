"""Hugging Face Hub models and data sets, as transformers and datasets treat them: a hub id downloads on
first use into the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_TOKEN`` for private or gated
repos; ``model.revision`` / ``data.revision`` pin a branch, tag or commit) and is read from the cache
after that. ``HF_HUB_OFFLINE=1`` or ``shardtune --offline`` means no network at all: what is not
cached fails at once, with one line naming the id and the cache.

This module imports only huggingface_hub (and only inside functions), so that commands can check a
recipe's sources before torch and transformers are loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from shardtune.core.catalog import EMBEDDED, TINY_MODELS
from shardtune.core.errors import BadInput, MachineError, ShardtuneError, environment_failure, error_chain

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_REPO_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", re.ASCII)  # huggingface_hub's own


def valid_repo_id(name: str) -> bool:
    """A repo id the hub can have (huggingface_hub's rules, checked without importing it or asking the
    network): ``name`` or ``org/name`` of letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``;
    not ending in ``.git``; at most 96 characters on each side of the ``/``."""
    return (
        bool(HUB_REPO_ID.fullmatch(name))
        and "--" not in name
        and ".." not in name
        and not name.endswith(".git")
    )


def offline() -> bool:
    """Downloads are off: HF_HUB_OFFLINE was set to a true value when huggingface_hub was imported
    (``--offline`` sets it before that) — what huggingface_hub itself obeys."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_location() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_builtin(name: str) -> bool:
    return name in EMBEDDED or name in TINY_MODELS


def is_local(name: str) -> bool:
    """A local directory (or a path spelled as one): never looked up on the hub."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def is_hub_id(name: str) -> bool:
    return not is_builtin(name) and not is_local(name) and valid_repo_id(name)


def cached_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The commit of ``repo_id`` at ``revision`` in the local cache (None: not cached)."""
    from huggingface_hub import try_to_load_from_cache

    filename = "config.json" if repo_type == "model" else "README.md"
    found = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    if isinstance(found, str):
        return Path(found).parent.name  # .../snapshots/<commit>/config.json
    if repo_type == "dataset":
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True)
            ).name
        except Exception:
            return None
    return None


def bound_requests() -> None:
    """Every request huggingface_hub makes from this process gives up after a silence of
    ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds (its own setting, default 10). Its API calls pass
    ``timeout=None`` (no limit) to its HTTP client, so a hub that accepts a connection and never
    answers would block a command for ever: a request without a limit gets this one.

    The first request that times out makes the hub unreachable for this process, as the probe of
    :func:`unreachable` would have: no retries (huggingface_hub would try five times, then the next
    file); from then on the hub is read from the cache only, as ``HF_HUB_OFFLINE=1`` (one note on
    stderr), and what is not cached fails in one line (:func:`describe_failure`). Set once, before the
    first request."""
    global _bounded
    if _bounded:
        return
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import _http

    seconds = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    made = _http.default_client_factory

    def bounded_client():
        client = made()
        client.timeout = type(client.timeout)(seconds)
        build, send = client.build_request, client.send

        def build_request(method, url, **kwargs):
            if kwargs.get("timeout") is None:  # huggingface_hub's "no limit"
                kwargs["timeout"] = seconds
            return build(method, url, **kwargs)

        def bounded_send(request, **kwargs):
            # (not retried by huggingface_hub; its file downloads then look in the cache)
            if _stalled:
                raise OfflineModeIsEnabled(f"the hub at {endpoint()} did not answer: {_stalled[0]}")
            try:
                return send(request, **kwargs)
            except httpx2.TimeoutException:
                limit = (request.extensions.get("timeout") or {}).get("read") or seconds
                _stalled.append(f"no answer within {limit:g} s to {request.method} {request.url}")
                _probed[endpoint()] = _stalled[0]
                go_offline(None)  # (said once something came from the cache: came_from_cache)
                raise OfflineModeIsEnabled(f"the hub at {endpoint()} did not answer: {_stalled[0]}") from None

        client.build_request, client.send = build_request, bounded_send
        return client

    _http.set_client_factory(bounded_client)
    _bounded = True
    # Its log records (retries, "Could not reach the Hub ...") go where every library's go when the
    # command line routes them (the root logger has a handler: into the run's log,
    # shardtune.cli.common.warnings_to_log), not onto stderr through a handler of its own.
    import logging

    if logging.getLogger().handlers:
        hub_logger = logging.getLogger("huggingface_hub")
        for handler in list(hub_logger.handlers):
            if type(handler) is logging.StreamHandler:
                hub_logger.removeHandler(handler)


_stalled: list[str] = []  # why the hub stopped answering in this process (bound_requests)
_bounded = False


def check_available(key: str, repo_id: str, revision: str | None, repo_type: str = "model") -> None:
    """Offline and not in the cache: one line now, before anything heavy is loaded. Online but the
    hub does not answer (:func:`unreachable`): the cached copy, as offline (one note on stderr), or one
    line if there is none — within seconds, not the minutes of huggingface_hub's retries."""
    if not is_hub_id(repo_id):
        return
    bound_requests()
    if not offline():
        why = unreachable()
        if why is None:
            return
        if cached_commit(repo_id, revision, repo_type) is None:
            raise BadInput(
                f"{key}: cannot reach the hub at {endpoint()} ({why}), and {repo_id!r} is not in the "
                f"Hugging Face cache ({cache_location()}); check the network or HF_ENDPOINT"
            )
        go_offline(f"the hub at {endpoint()} does not answer ({why}): {repo_id} comes from the cache")
        return
    if cached_commit(repo_id, revision, repo_type) is None:
        raise not_cached(key, repo_id, revision, repo_type)


# How long the hub may take to answer one request before it counts as unreachable (a cached model is
# then used as HF_HUB_OFFLINE=1 would).
PROBE_TIMEOUT_S = 3.0
_probed: dict[str, str | None] = {}


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def unreachable() -> str | None:
    """Why the hub endpoint gives no answer within PROBE_TIMEOUT_S (refused, no answer, no such
    host), or None when it answers (any HTTP status is an answer). Asked once per process."""
    import urllib.error
    import urllib.request

    url = endpoint()
    if url not in _probed:
        why = None
        try:
            urllib.request.urlopen(urllib.request.Request(url + "/", method="HEAD"), timeout=PROBE_TIMEOUT_S)
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            why = (
                "no answer" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else str(reason)
            )
        _probed[url] = why
    return _probed[url]


def came_from_cache(repo_id: str) -> None:
    """After a load that succeeded: if the hub stopped answering meanwhile (:func:`bound_requests`),
    one note on stderr that ``repo_id`` came from the cache."""
    import sys

    if _stalled and repo_id not in _noted:
        _noted.add(repo_id)
        sys.stderr.write(
            f"note: the hub at {endpoint()} did not answer ({_stalled[0]}): {repo_id} came from the cache "
            "(as HF_HUB_OFFLINE=1)\n"
        )


_noted: set[str] = set()


def go_offline(note: str | None) -> None:
    """From now on this process (and what it starts) reads the hub from the cache only; ``note``: one
    line on stderr that says why."""
    import os
    import sys

    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if note is not None:
        sys.stderr.write(f"note: {note} (as HF_HUB_OFFLINE=1)\n")


def not_cached(key: str, repo_id: str, revision: str | None, repo_type: str = "model") -> BadInput:
    at = f" at revision {revision!r}" if revision else ""
    what = (
        f"is not a builtin alias ({', '.join([*EMBEDDED, *TINY_MODELS])}), a local directory, or a hub model{at} "
        f"in the Hugging Face cache ({cache_location()})"
        if repo_type == "model"
        else f"is not a hub dataset{at} in the Hugging Face cache ({cache_location()})"
    )
    return BadInput(f"{key}: {repo_id!r} {what}; downloads are off (HF_HUB_OFFLINE=1 or --offline)")


def check_recipe_sources(recipe) -> None:
    """Every hub id a recipe names (model, data) is at hand, or a one-line error — fast, when offline."""
    check_available("model.name", recipe.model.name, recipe.model.revision)
    for i, source in enumerate(recipe.data.source_list()):
        if source.hub is not None:
            key = "data.hub" if recipe.data.sources is None else f"data.sources.{i}.hub"
            check_dataset_id(key, source.hub)
            check_available(key, source.hub, source.revision, repo_type="dataset")


def check_dataset_id(key: str, repo_id: str) -> None:
    """A hub dataset id that the hub can have, or one line naming ``key`` (before any network call)."""
    if not valid_repo_id(repo_id):
        raise BadInput(
            f"{key}: {repo_id!r} is not a hub dataset id (org/name: letters, digits, '-', '_', '.'; no '--' "
            "or '..'; at most 96 characters each)"
        )


def describe_failure(key: str, repo_id: str, revision: str | None, error: BaseException) -> ShardtuneError:
    """One line for a failed hub download, from the error (or its causes) huggingface_hub raised; the
    machine refusing the download's writes (a read-only or full HF_HOME) is the machine's (exit 5)."""
    from huggingface_hub import errors

    machine = environment_failure(error)
    if machine is not None:
        return MachineError(f"{key}: cannot download {repo_id} into {cache_location()}: {machine}")

    chain = error_chain(error)
    kinds = {type(e) for e in chain}

    def has(kind) -> bool:
        return any(issubclass(k, kind) for k in kinds)

    at = f" at revision {revision!r}" if revision else ""
    if _stalled:
        return BadInput(
            f"{key}: cannot reach the hub at {endpoint()} ({_stalled[0]}), and {repo_id!r}{at} is not in "
            f"the Hugging Face cache ({cache_location()}); check the network or HF_ENDPOINT "
            "(HF_HUB_DOWNLOAD_TIMEOUT sets the seconds)"
        )
    if offline():
        return not_cached(key, repo_id, revision, "dataset" if key.startswith("data.") else "model")
    if has(errors.GatedRepoError):
        return BadInput(f"{key}: {repo_id} is gated: accept its terms on the hub, then set HF_TOKEN")
    if has(errors.RevisionNotFoundError):
        field = key.rsplit(".", 1)[0] + ".revision"
        return BadInput(f"{field}: {revision!r} is not a branch, tag or commit of {repo_id}")
    if has(errors.RepositoryNotFoundError):
        return BadInput(
            f"{key}: the hub has no repository {repo_id!r} (or it is private: set HF_TOKEN); builtin models: "
            f"{', '.join([*EMBEDDED, *TINY_MODELS])}"
        )
    first = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
    return BadInput(f"{key}: cannot download {repo_id}{at}: {first}")


def base_model_record(name: str, revision: str | None) -> dict:
    """How a run records its base model so that it works from any directory and on another machine:
    the alias of a builtin, the absolute path of a local directory, the hub id with the commit it
    resolved to."""
    if is_builtin(name):
        return {"name": name, "source": "builtin"}
    if is_local(name):
        return {"name": str(Path(name).expanduser().resolve()), "source": "local"}
    return {"name": name, "source": "hub", "revision": cached_commit(name, revision) or revision}
