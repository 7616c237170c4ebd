-- The GPUs a listing of agents shows (how many, and what the first is), written with
-- each inventory like the facts of 0009.
ALTER TABLE agents ADD COLUMN inventory_gpus BIGINT;
ALTER TABLE agents ADD COLUMN inventory_gpu TEXT;
UPDATE agents SET
    inventory_gpus = COALESCE(json_array_length(inventory, '$.gpus'), 0),
    inventory_gpu = COALESCE(
        NULLIF(trim(json_extract(inventory, '$.gpus[0].model')), ''),
        NULLIF(trim(json_extract(inventory, '$.gpus[0].vendor')), ''),
        NULLIF(trim(json_extract(inventory, '$.gpus[0].vendor_id')), '') || ':' || NULLIF(trim(json_extract(inventory, '$.gpus[0].device_id')), '')
    )
WHERE inventory IS NOT NULL;
