-- Payments, owned by the order-payment handler. The orders and
-- order_events tables it also writes come from order-created, whose
-- migrations run first.

CREATE TABLE payments (
    payment_id text PRIMARY KEY,
    order_id   text NOT NULL,
    amount     numeric(12, 2) NULL CHECK (amount >= 0),
    paid_at    timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX payments_order_id ON payments (order_id);
