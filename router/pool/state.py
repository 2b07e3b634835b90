"""The model lifecycle states and the one table of allowed transitions."""

from __future__ import annotations

import enum


class ModelState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"


S = ModelState

# A crash can happen in any state with a live child, so READY/DRAINING may fall
# straight to STOPPED (restartable) or FAILED (circuit opened). FAILED leaves only
# through a half-open retry (STARTING) or ResetModel (STOPPED).
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.STOPPED: frozenset({S.STARTING, S.FAILED}),
    S.STARTING: frozenset({S.LOADING, S.READY, S.STOPPING, S.STOPPED, S.FAILED}),
    S.LOADING: frozenset({S.READY, S.STOPPING, S.STOPPED, S.FAILED}),
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.STOPPED, S.FAILED}),
    S.DRAINING: frozenset({S.STOPPING, S.STOPPED, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
}

# States in which a child process exists (or is being created).
LIVE_STATES = frozenset({S.STARTING, S.LOADING, S.READY, S.DRAINING, S.STOPPING})


class InvalidTransition(RuntimeError):
    """A bug: code asked for a transition the table forbids."""


def check_transition(current: ModelState, target: ModelState) -> None:
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current.value} -> {target.value} is not allowed")
