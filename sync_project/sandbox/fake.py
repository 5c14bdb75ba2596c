"""Plausible CRM content, drawn from a seeded RNG so a run can be replayed exactly.

Deal stages are HubSpot's default pipeline stage ids, so the sandbox reads like the real thing.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FIRST_NAMES = (
    "Ada",
    "Alan",
    "Barbara",
    "Claude",
    "Donald",
    "Edsger",
    "Frances",
    "Grace",
    "Hedy",
    "Ivan",
    "John",
    "Katherine",
    "Linus",
    "Margaret",
    "Niklaus",
    "Radia",
    "Shafi",
    "Tim",
    "Vint",
    "Whitfield",
)
LAST_NAMES = (
    "Lovelace",
    "Turing",
    "Liskov",
    "Shannon",
    "Knuth",
    "Dijkstra",
    "Allen",
    "Hopper",
    "Lamarr",
    "Sutherland",
    "McCarthy",
    "Johnson",
    "Torvalds",
    "Hamilton",
    "Wirth",
    "Perlman",
    "Goldwasser",
    "Berners-Lee",
    "Cerf",
    "Diffie",
)
COMPANIES = (
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark Industries",
    "Wayne Enterprises",
    "Soylent",
    "Tyrell",
    "Cyberdyne",
    "Wonka",
    "Vandelay Industries",
)
DEAL_STAGES = (
    "appointmentscheduled",
    "qualifiedtobuy",
    "presentationscheduled",
    "decisionmakerboughtin",
    "contractsent",
    "closedwon",
    "closedlost",
)
DEAL_PRODUCTS = ("Platform licence", "Support plan", "Onboarding", "Data add-on", "Enterprise seats")

Operation = Literal["created", "updated", "deleted"]


class ChangeMix(BaseModel):
    """Relative weights of the operations random changes perform, and of contacts versus deals."""

    model_config = ConfigDict(extra="forbid")

    create: float = Field(default=3.0, ge=0)
    update: float = Field(default=6.0, ge=0)
    delete: float = Field(default=1.0, ge=0)
    #: Share of changes that touch deals rather than contacts, 0..1.
    deal_share: float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _some_weight(self) -> ChangeMix:
        if self.create + self.update + self.delete <= 0:
            raise ValueError("at least one of create, update, delete must have a positive weight")
        return self

    def pick_operation(self, rng: random.Random) -> Operation:
        return rng.choices(("created", "updated", "deleted"), weights=(self.create, self.update, self.delete))[0]


def contact_fields(rng: random.Random, number: int) -> dict[str, Any]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    company = rng.choice(COMPANIES + (None,))
    domain = (company or "example").lower().replace(" ", "") + ".test"
    return {
        "email": f"{first}.{last}.{number}@{domain}".lower(),
        "first_name": first,
        "last_name": last,
        "company": company,
    }


def contact_changes(rng: random.Random, current: dict[str, Any]) -> dict[str, Any]:
    """A change that always alters at least one field, as a real edit would."""
    field = rng.choice(("company", "last_name", "email"))
    if field == "company":
        return {"company": rng.choice([c for c in COMPANIES if c != current["company"]])}
    if field == "last_name":
        return {"last_name": rng.choice([n for n in LAST_NAMES if n != current["last_name"]])}
    local, _, domain = current["email"].partition("@")
    return {"email": f"{local}.{rng.randrange(10, 100)}@{domain}"}


def deal_fields(rng: random.Random, number: int, contact_id: str | None) -> dict[str, Any]:
    return {
        "name": f"{rng.choice(DEAL_PRODUCTS)} #{number}",
        "amount": round(rng.uniform(500, 50_000), 2),
        "stage": DEAL_STAGES[0],
        "contact_id": contact_id,
    }


def deal_changes(rng: random.Random, current: dict[str, Any]) -> dict[str, Any]:
    if rng.random() < 0.6:
        return {"stage": rng.choice([s for s in DEAL_STAGES if s != current["stage"]])}
    amount = current["amount"]
    while amount == current["amount"]:
        amount = round(current["amount"] * rng.uniform(0.8, 1.25), 2)
    return {"amount": amount}
