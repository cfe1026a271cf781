"""character cards and branching conversations: a personality keeps the card it was imported from
(and its picture); a message knows its parent, and a conversation the newest message of its active
path, so that regenerated replies and edited messages become branches of one tree

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("personalities") as batch:
        batch.add_column(sa.Column("card", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("avatar", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("parent_id", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("head_id", sa.BigInteger(), nullable=True))
    op.create_index("ix_messages_parent_id", "messages", ["parent_id"])
    # Conversations so far were straight lines: each message follows the one stored before it, and
    # the newest message ends the active path.
    op.execute(
        "UPDATE messages SET parent_id = (SELECT max(earlier.id) FROM messages AS earlier "
        "WHERE earlier.conversation_id = messages.conversation_id AND earlier.id < messages.id)"
    )
    op.execute(
        "UPDATE conversations SET head_id = (SELECT max(m.id) FROM messages AS m WHERE m.conversation_id = conversations.id)"
    )


def downgrade() -> None:
    op.drop_index("ix_messages_parent_id", table_name="messages")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("head_id")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("parent_id")
    with op.batch_alter_table("personalities") as batch:
        batch.drop_column("avatar")
        batch.drop_column("card")
