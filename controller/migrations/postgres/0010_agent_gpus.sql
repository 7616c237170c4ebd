-- The GPUs a listing of agents shows (how many, and what the first is), written with
-- each inventory like the facts of 0009.
ALTER TABLE agents ADD COLUMN inventory_gpus BIGINT;
ALTER TABLE agents ADD COLUMN inventory_gpu TEXT;
UPDATE agents SET
    inventory_gpus = CASE WHEN jsonb_typeof(CAST(inventory AS jsonb) -> 'gpus') = 'array'
        THEN jsonb_array_length(CAST(inventory AS jsonb) -> 'gpus') ELSE 0 END,
    inventory_gpu = COALESCE(
        NULLIF(trim(CAST(inventory AS jsonb) #>> '{gpus,0,model}'), ''),
        NULLIF(trim(CAST(inventory AS jsonb) #>> '{gpus,0,vendor}'), ''),
        NULLIF(trim(CAST(inventory AS jsonb) #>> '{gpus,0,vendor_id}'), '') || ':' || NULLIF(trim(CAST(inventory AS jsonb) #>> '{gpus,0,device_id}'), '')
    )
WHERE inventory IS NOT NULL;
