-- Orders and their history, owned by the order-created handler.
-- order-payment (migrated after this handler) updates orders and appends
-- to order_events too.

CREATE TABLE orders (
    order_id    text PRIMARY KEY,
    customer_id text NOT NULL,
    total       numeric(12, 2) NOT NULL CHECK (total >= 0),
    status      text NOT NULL DEFAULT 'pending',
    created_at  timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at  timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- One row per committed handler run that changed an order: the audit
-- trail, and the proof in tests that a handler ran exactly once.
CREATE TABLE order_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id     text NOT NULL,
    kind         text NOT NULL,
    event_source text NOT NULL,
    event_id     text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX order_events_order_id ON order_events (order_id);
