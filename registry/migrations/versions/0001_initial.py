"""The first registry schema: nodes, principals and groups, catalog and holders, grants, tokens,
subscriptions, the hash-chained audit log and its counters.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(128), primary_key=True),
        sa.Column("cert_pem", sa.LargeBinary, nullable=False),
        sa.Column("cert_fingerprint", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False, index=True),
        sa.Column("signing_key", sa.LargeBinary, nullable=False),
        sa.Column("kem_key", sa.LargeBinary, nullable=False),
        sa.Column("kem_suite", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("address", sa.String(256), nullable=False),
        sa.Column("registered_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "principals",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
    )
    op.create_table(
        "group_members",
        sa.Column("group_name", sa.String(200), primary_key=True),
        sa.Column("member", sa.String(200), primary_key=True),
    )
    op.create_index("ix_group_members_member", "group_members", ["member"])
    op.create_table(
        "cube_versions",
        sa.Column("cube_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("chain", sa.Text, nullable=False),
        sa.Column("signed_manifest", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("publisher", sa.String(128), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("published_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_cube_versions_digest", "cube_versions", ["digest"])
    op.create_table(
        "holders",
        sa.Column("cube_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("node_id", sa.String(128), primary_key=True),
        sa.Column("digest", sa.String(80), nullable=False),
    )
    op.create_index("ix_holders_digest", "holders", ["digest"])
    op.create_table(
        "grants",
        sa.Column("cube_id", sa.String(128), primary_key=True),
        sa.Column("principal", sa.String(200), primary_key=True),
        sa.Column("action", sa.String(16), primary_key=True),
        sa.Column("expires_at", sa.BigInteger, nullable=True),
        sa.Column("granted_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("token_id", sa.String(64), primary_key=True),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("cube_id", sa.String(128), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    op.create_index("ix_tokens_scope", "tokens", ["principal", "cube_id"])
    op.create_table(
        "subscriptions",
        sa.Column("node_id", sa.String(128), primary_key=True),
        sa.Column("cube_id", sa.String(128), primary_key=True),
    )
    op.create_table(
        "audit",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("cube_id", sa.String(200), nullable=False),
        sa.Column("allowed", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.LargeBinary, nullable=False),
        sa.Column("entry_hash", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
    )
    op.bulk_insert(
        sa.table("counters", sa.column("name"), sa.column("value"), sa.column("hash")),
        [{"name": "audit", "value": 0, "hash": b"\0" * 32}, {"name": "catalog", "value": 0, "hash": b""}],
    )


def downgrade() -> None:
    for name in (
        "counters", "audit", "subscriptions", "tokens", "grants", "holders", "cube_versions",
        "group_members", "principals", "nodes",
    ):  # fmt: skip
        op.drop_table(name)
