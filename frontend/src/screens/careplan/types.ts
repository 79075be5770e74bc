// The care plan's choices in form order, and 第1表's values by the edit command's keys. The plan
// itself is the generated `PlanView` (`$lib/api`): choices travel as the form's words (`要介護2`,
// `認定済`, `一人暮らし`, `男`); dates as `YYYY-MM-DD`; times as `HH:MM`.

import type {
  CareLevel,
  Certification,
  HouseworkReason,
  PlanCategory,
  PlanField,
  Sex,
  Sheet1,
  Weekday,
} from '$lib/api';

/** 要介護状態区分, in form order (the form's words are what the engine sends and accepts). */
export const CARE_LEVELS = ['事業対象者', '要支援1', '要支援2', '要介護1', '要介護2', '要介護3', '要介護4', '要介護5'] as const satisfies readonly CareLevel[];

/** 認定済・申請中. */
export const CERTIFICATIONS = ['認定済', '申請中'] as const satisfies readonly Certification[];

/** 生活援助中心型の算定理由. */
export const HOUSEWORK_REASONS = ['一人暮らし', '家族等が障害、疾病等', 'その他'] as const satisfies readonly HouseworkReason[];

/** 性別. */
export const SEXES = ['男', '女'] as const satisfies readonly Sex[];

/** 月〜日, the form's column order (what the engine stores and sends). */
export const WEEKDAYS = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'] as const satisfies readonly Weekday[];

// Every choice the engine has is one this screen offers (fails to compile when the engine adds one).
type Offers<List extends readonly string[], All extends List[number]> = [List, All];
export type _Complete = [
  Offers<typeof CARE_LEVELS, CareLevel>,
  Offers<typeof CERTIFICATIONS, Certification>,
  Offers<typeof HOUSEWORK_REASONS, HouseworkReason>,
  Offers<typeof SEXES, Sex>,
  Offers<typeof WEEKDAYS, Weekday>,
];

/** The value of a 第1表 field as the edit command takes it (choices as their words, category as `初回,継続`). */
export function fieldValue(s: Sheet1, field: PlanField): string {
  switch (field) {
    case 'category':
      return categoryValue(s.category);
    case 'certification':
      return s.certification ?? '';
    case 'care_level':
      return s.care_level ?? '';
    case 'housework_reason':
      return s.housework_reason ?? '';
    case 'resident.sex':
      return s.resident.sex ?? '';
  }
  const [a, b] = field.split('.') as [string, string | undefined];
  const top = (s as unknown as Record<string, unknown>)[a];
  if (b === undefined) return typeof top === 'string' ? top : '';
  const v = (top as Record<string, unknown> | undefined)?.[b];
  return typeof v === 'string' ? v : '';
}

/** 初回・紹介・継続 as the edit command's comma-separated value. */
export function categoryValue(c: PlanCategory): string {
  const parts: string[] = [];
  if (c.initial) parts.push('初回');
  if (c.referral) parts.push('紹介');
  if (c.continuing) parts.push('継続');
  return parts.join(',');
}

/** A blank 第1表 (what a new plan starts from before the form fills it). */
export function emptySheet1(): Sheet1 {
  return {
    created_on: '',
    changed_on: '',
    first_created_on: '',
    category: { initial: false, referral: false, continuing: false },
    certification: null,
    certified_on: '',
    valid_from: '',
    valid_to: '',
    care_level: null,
    resident: { name: '', kana: '', sex: null, birth_date: '', postal_code: '', address: '', phone: '' },
    insurer_number: '',
    insured_number: '',
    assessment: '',
    committee_opinion: '',
    policy: '',
    housework_reason: null,
    housework_reason_other: '',
    planner: '',
    office: { name: '', code: '', postal_code: '', address: '' },
    consent: { date: '', by: '' },
  };
}

/**
 * Records in `s` a value the engine acknowledged for `field` (as `fieldValue` reads it back), so the
 * plan held here matches the engine until the next reload.
 */
export function setFieldValue(s: Sheet1, field: PlanField, value: string) {
  const obj = s as unknown as Record<string, Record<string, unknown> | unknown>;
  switch (field) {
    case 'category':
      s.category = {
        initial: value.includes('初回'),
        referral: value.includes('紹介'),
        continuing: value.includes('継続'),
      };
      return;
    case 'certification':
      s.certification = (value || null) as Certification | null;
      return;
    case 'care_level':
      s.care_level = (value || null) as CareLevel | null;
      return;
    case 'housework_reason':
      s.housework_reason = (value || null) as HouseworkReason | null;
      return;
    case 'resident.sex':
      s.resident.sex = (value || null) as Sex | null;
      return;
  }
  const [a, b] = field.split('.') as [string, string | undefined];
  if (b === undefined) obj[a] = value;
  else (obj[a] as Record<string, unknown>)[b] = value;
}
