"""results back to the PACS: result objects (SR, SC) and the outbound send queue

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 14:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the job states (db.models.JobState) as they were when this was written.
_STATES = ("queued", "running", "done", "not_assessed", "failed")


def _state(name: str) -> sa.Enum:
    return sa.Enum(*_STATES, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "result_objects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "sr", "sc", name="result_kind", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
        ),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("predecessor_id", sa.Integer(), nullable=True),
        sa.Column("state", _state("result_state"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker_id", sa.String(length=128), nullable=True),
        sa.Column("file_path", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_result_objects_instance_id_instances")
        ),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_result_objects_prediction_id_predictions"),
        ),
        sa.ForeignKeyConstraint(
            ["predecessor_id"],
            ["result_objects.id"],
            name=op.f("fk_result_objects_predecessor_id_result_objects"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result_objects")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_result_objects_sop_instance_uid")),
    )
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.create_index("ix_result_objects_instance_id", ["instance_id"], unique=False)
        batch_op.create_index(
            "ix_result_objects_state_lease_until", ["state", "lease_until"], unique=False
        )

    op.create_table(
        "send_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("object_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=16), nullable=False),
        sa.Column("state", _state("send_state"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker_id", sa.String(length=128), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["object_id"], ["result_objects.id"], name=op.f("fk_send_jobs_object_id_result_objects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_jobs")),
        sa.UniqueConstraint("object_id", "destination", name="uq_send_jobs_object_destination"),
    )
    with op.batch_alter_table("send_jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_send_jobs_state_lease_until", ["state", "lease_until"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("send_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_send_jobs_state_lease_until")
    op.drop_table("send_jobs")
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.drop_index("ix_result_objects_state_lease_until")
        batch_op.drop_index("ix_result_objects_instance_id")
    op.drop_table("result_objects")
