"""Progress bars: tqdm on the main process only, and silent wherever the user set TQDM_DISABLE=1.

tqdm reads TQDM_* environment variables once, when it is imported, and only for the arguments a call does not pass:
`disable=False` on the main process would override a user's TQDM_DISABLE, and a notebook that sets the variable
after importing tqdm would be ignored. So the variable is read here, at each call.
"""

import os

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, main_process: bool = True, **kwargs) -> tqdm:
    user_disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
    if user_disabled or not main_process:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
