"""The flag checks every command shares: a bound on an integer flag, a flag given where it does not apply."""

from __future__ import annotations

from parameternet.errors import ParameterNetError


def check_flags(*checks: tuple[str, int | list[int] | None, int]) -> None:
    """Raise ParameterNetError naming the flag, as the user typed it, of the first ``(flag, value, minimum)`` whose
    value (or one of its values) is below the minimum; a None value (the flag not given) passes."""
    for flag, value, minimum in checks:
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < minimum:
                raise ParameterNetError(f"{flag} must be an integer >= {minimum}, got {v}.")


def img_size_check(value: int | None) -> tuple[str, int | None, int]:
    """The :func:`check_flags` entry of ``--img-size``: no smaller than an image model takes."""
    from parameternet.toolkit import MIN_IMG_SIZE

    return ("--img-size", value, MIN_IMG_SIZE)


def refuse(flag: str, given: bool, where: str, fix: str = "drop it") -> None:
    """Raise ParameterNetError when ``flag`` was ``given`` where it does not apply (``where`` says where it does)."""
    if given:
        raise ParameterNetError(f"{flag} applies {where}; {fix}.")
